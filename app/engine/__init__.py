"""Admission, the queue and its batch policy, and the one thread that runs the model. Knows nothing of HTTP."""
