"""Stage 2: the COURIER image encoder, its loss, readers and distributed launch."""
