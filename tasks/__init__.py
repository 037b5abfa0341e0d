"""Celery tasks: thin — take the message, call a service, record the outcome."""
