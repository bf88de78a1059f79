# generated; do not edit
