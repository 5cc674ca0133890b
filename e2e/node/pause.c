/* The pod sandbox's process (what registry.k8s.io/pause does): hold the pod's namespaces,
 * reap orphans, exit on SIGINT/SIGTERM. Built static into a one-file image by provision.sh,
 * since no registry is reachable for the usual pause image. */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void quit(int sig) { (void)sig; _exit(0); }
static void reap(int sig) {
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
}

int main(void) {
    struct sigaction q = {.sa_handler = quit}, r = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP};
    if (sigaction(SIGINT, &q, NULL) || sigaction(SIGTERM, &q, NULL) || sigaction(SIGCHLD, &r, NULL))
        return 1;
    for (;;)
        pause();
}
