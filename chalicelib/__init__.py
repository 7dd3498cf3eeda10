"""Logic of the devbox service: the instance, network access, DNS, configuration."""
