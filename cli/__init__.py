"""vitprune's command line (click)."""
