"""The mechanisms (attention hooks, banks, injection modules), shared by nodes and trainers."""
