"""walletq's domain and its persistence. Imports neither Celery nor the CLI."""
