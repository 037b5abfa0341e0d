"""The Celery app, the producer client, the CLI and the settings that wire them."""
