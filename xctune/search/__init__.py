"""The search: study files, the space of valid plans, the Optuna study and its workers and storage, engine targets, and the exact optimum that grades it."""
