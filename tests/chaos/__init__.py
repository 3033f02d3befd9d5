"""The chaos suite: three ``arqd serve`` daemons on one backend (sqlite on a shared file, or
DynamoDB + S3 on moto behind fault proxies) run mixed jobs while they are killed, terminated,
paused past their leases, reloaded with good and broken configs, and (DynamoDB) fed backend
faults; then every job is checked (see ``analysis.py``). ``test_chaos.py`` is the short CI run;
``python -m tests.chaos --minutes 30`` the soak."""
