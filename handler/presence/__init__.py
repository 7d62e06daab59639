"""Who is online: the pure board (`board`), the link between nodes (`link`), and the service
that tells contacts and keeps last-seen times (`service`)."""
