"""Stress scripts: slow, randomised fault drills run by hand (not part of the pytest suite)."""
