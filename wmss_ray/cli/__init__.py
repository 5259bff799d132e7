"""How users drive the package: ``main`` (the ``wmss`` command), ``submit`` (Ray job client with
token auth), ``jobs`` (the bodies of the ``jobs/`` entrypoints), ``check_cluster`` (smoke test)."""
