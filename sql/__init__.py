"""The ordered migrations applied by ``cbmflow db migrate``, installed as ``cbmflow.migrations``.

This file makes the folder a regular package: setuptools' editable installs map only regular
packages to a folder outside the package tree, and ``cbmflow.db`` reads the files through
``importlib.resources`` under that name in editable and wheel installs alike.
"""
