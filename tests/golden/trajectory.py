"""Golden runners: trajectory."""
