"""Built-in miafw plugins, registered through miafw's own entry points (never by import side effect)."""
