"""`reward-server bench` and the peers it measures against."""
