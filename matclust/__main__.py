from matclust.cli import run

if __name__ == "__main__":  # not when a worker process of a distributed run imports it
    run()
