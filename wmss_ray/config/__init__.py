"""The one config schema: ``schema.WMSSConfig`` (its sections in ``sections``) and
``loading.load_config`` (YAML + dotted ``--set`` overrides, did-you-mean for unknown keys)."""
