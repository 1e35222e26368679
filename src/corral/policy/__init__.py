"""Backend-neutral policy: what may be touched, reached and used — never how it is enforced."""
