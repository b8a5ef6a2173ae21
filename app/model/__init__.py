"""The scoring recipe, collation, the reward head and its forward, checkpoint formats and loading. Knows nothing of
HTTP or of the queue that feeds it."""
