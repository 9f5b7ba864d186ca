"""REST API, JRC CbM compatible."""
