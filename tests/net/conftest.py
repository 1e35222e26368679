from nettestbed import sandbox, world  # noqa: F401 - fixtures for this folder
