"""The docs tier: a package, so that its `docs` fixture (package scope) stops the README's head and checks
that no Ray process is left when the tier ends, before other tiers start their own clusters."""
