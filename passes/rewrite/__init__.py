"""lrfx passes."""
