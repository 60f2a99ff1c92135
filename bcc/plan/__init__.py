"""plan: change profiles (calibration), cache schedules and the planner that turns one into the other."""
