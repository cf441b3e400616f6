"""What a model is: the definitions shared by the sites and the coordinator."""
