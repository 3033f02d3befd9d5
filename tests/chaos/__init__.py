"""The chaos suite: three ``arqd serve`` daemons on one backend (sqlite on a shared file,
DynamoDB + S3 on moto behind fault proxies, or a PostgreSQL database of the run's own with
results in shared files) run mixed jobs while they are killed, terminated, paused past their
leases, reloaded with good and broken configs, (DynamoDB) fed backend faults and (PostgreSQL)
their server restarted or frozen under them; then every job is checked (see ``analysis.py``).
``test_chaos.py`` is the short CI run; ``python -m tests.chaos --minutes 30`` the soak."""
