"""Provisioner: scales worker VMs (or local processes) by queue depth."""
