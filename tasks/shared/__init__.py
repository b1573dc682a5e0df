"""What two stages share: model refs and loading, label systems, tag categories, ground truth, lineage."""
