"""xctune: find device maps that run, fit and are fast for InternLM-XComposer."""
