-- Coherence pairs (GenerateCard(coh)): an SLC card input is paired with the previous acquisition of
-- its relative orbit whose footprint meets it, 6 or 12 days earlier (± 1 day; 6 preferred), by the
-- watcher when either of the two is recorded. `partner_input_id` is that earlier input and
-- `gap_days` the nominal gap (6 or 12): the job reads both here (not from its message, so a job
-- re-published after a re-pairing still runs the current pair) and registers 'c6' or 'c12' scenes.
-- An SLC without a partner has no job and waits in 'awaiting_card'. Re-runnable.
ALTER TABLE card_inputs ADD COLUMN IF NOT EXISTS partner_input_id bigint REFERENCES card_inputs (id);
ALTER TABLE card_inputs ADD COLUMN IF NOT EXISTS gap_days integer;
ALTER TABLE card_inputs DROP CONSTRAINT IF EXISTS card_inputs_gap_days_check;
ALTER TABLE card_inputs ADD CONSTRAINT card_inputs_gap_days_check CHECK (gap_days IS NULL OR gap_days IN (6, 12));
-- The pairing looks up SLCs of one relative orbit by acquisition time, in both directions.
CREATE INDEX IF NOT EXISTS card_inputs_slc_orbit_idx ON card_inputs (relative_orbit, acquired_at) WHERE kind = 'slc';
CREATE INDEX IF NOT EXISTS card_inputs_partner_idx ON card_inputs (partner_input_id) WHERE partner_input_id IS NOT NULL;
