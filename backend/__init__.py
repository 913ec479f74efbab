"""Label Studio ML backend serving ODISE."""
