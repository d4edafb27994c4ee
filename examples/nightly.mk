# A nightly append job: every night's collection (incoming/YYYY-MM-DD.h5, dataset "matrices")
# is added to one result store without clustering the earlier nights again.
#
#     make -f examples/nightly.mk                # from cron, e.g. 30 2 * * *
#     make -f examples/nightly.mk NIGHT=2026-12-01
#
# Each night leaves a stamp (appended/NIGHT.done), so a night is appended once; `matclust
# append` refuses a collection the store already records anyway (exit 2). A failed run leaves
# the store as it was (the grown store replaces it only when complete) and no stamp, so the
# next run tries again. The first night creates the store with `cluster`.

MATCLUST ?= matclust
STORE    ?= store/weights.h5
INCOMING ?= incoming
NIGHT    ?= $(shell date -u -d yesterday +%F)
RANK     ?= 8
EPS      ?= 0.05

.PHONY: nightly verify
nightly: appended/$(NIGHT).done

appended/%.done: $(INCOMING)/%.h5
	@mkdir -p $(dir $(STORE)) appended
	if [ -e $(STORE) ]; then \
	    $(MATCLUST) append $(STORE) $< --dataset matrices --quiet; \
	else \
	    $(MATCLUST) cluster $< --dataset matrices -o $(STORE) --rank $(RANK) --eps $(EPS) --quiet; \
	fi
	$(MATCLUST) verify $(STORE) --quiet
	touch $@

# Checks the store against every night it records, in order.
verify:
	$(MATCLUST) verify $(STORE)
