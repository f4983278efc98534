"""The HTTP layer: Bottle routes, one module per resource (messages, streams, admin),
around the request validation and JSON errors they share. app.create_app builds it."""
