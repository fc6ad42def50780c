"""Label jobs on the driver: plan the input, place and dispatch workers, commit the output."""
