"""Reading what the loop made: the HTML report and the pre-flight check."""
