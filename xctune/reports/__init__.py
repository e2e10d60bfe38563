"""What a search leaves behind (best map, leaderboard, plots, summary) and side-by-side comparisons of studies and benchmark runs."""
