"""The CLI's command groups, one module per group: each parses its arguments, calls the services of the features
it needs and prints. Part of the application layer, so a command may wire several features together."""
