from matclust.cli import main

main()
