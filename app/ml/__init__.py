"""Model side of the service: loading, the scoring recipe and the forward pass. Never imports the HTTP layer."""
