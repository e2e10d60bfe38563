"""Plans: a device map plus dtypes, and the judges of whether one runs (check, constraints) and the maps people use today (baselines)."""
