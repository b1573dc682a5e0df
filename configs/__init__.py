"""The YAML configs shipped with the package: `ram-engine -c NAME` finds `configs/NAME.yaml` from a checkout,
an installed wheel or the Docker image (see tasks.engine.config.resolve_config)."""
