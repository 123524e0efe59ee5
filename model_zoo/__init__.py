"""Transform nets, the VGG-16 loss network, the trainer and the zoo of trained models."""
