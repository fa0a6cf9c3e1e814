"""Multi-site deployment: certificates, SuperNode keys, registration, withdrawal, health."""
