# One image for the migrate job, the workers, beat and Flower (see docker-compose.yml).
FROM python:3.12-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 WALLETQ_HOME=/var/lib/walletq
WORKDIR /app
COPY pyproject.toml README.md celeryconfig.py ./
COPY services ./services
COPY worker ./worker
COPY tasks ./tasks
COPY migrations ./migrations
RUN pip install --no-cache-dir '.[flower]' \
    && useradd --system --home /var/lib/walletq walletq \
    && mkdir -p /var/lib/walletq/producers \
    && chown walletq /var/lib/walletq /var/lib/walletq/producers
USER walletq
CMD ["celery", "-A", "worker", "worker", "--loglevel=INFO"]
