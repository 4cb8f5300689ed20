"""Call tests: N participants in separate processes on one mesh call, and their report."""
