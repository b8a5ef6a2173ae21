"""Preference data, Bradley-Terry training, the frozen-feature cache and evaluation."""
