"""Load-group server: SQLite storage, installer CLI and the MQTT service."""
