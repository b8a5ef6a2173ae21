"""The HTTP edge: app factory and lifespan, routes, schemas, errors, middleware, metrics, the Ray Serve deployment."""
