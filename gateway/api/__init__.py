"""HTTP: the provider inbox, the ops API, health. FastAPI, documented in OpenAPI at /docs."""
