"""README stays true: its settings table is the code's."""

from cbmflow.dev.readme_sync import README, synced


def test_readme_settings_table_matches_code() -> None:
    text = README.read_text()
    assert synced(text) == text, "README settings table is stale: run `python -m cbmflow.dev.readme_sync`"
