"""One rewrite rule per file: pattern, check (returns why it does not match), rewrite."""
