"""The devbox client: the `devbox` command, the local stack, deploy and destroy."""
